from specedge_cli.main import run

run()
