from hub_server.cli import app

app(prog_name="hub_server")
