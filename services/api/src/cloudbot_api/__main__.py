from cloudbot_api.main import run

run()
