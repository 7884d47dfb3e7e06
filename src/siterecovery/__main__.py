from siterecovery.cli.main import main

main()
