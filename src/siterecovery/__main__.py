from siterecovery.cli.main import app

app()
