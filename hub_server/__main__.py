from hub_server.cli import run

run()
