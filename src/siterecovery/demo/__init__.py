"""`siterecovery demo`: the whole DR cycle on an embedded lab, with every service a real process."""
