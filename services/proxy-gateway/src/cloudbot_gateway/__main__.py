from cloudbot_gateway.main import run

run()
