"""What runs on the machine itself, not in the control plane.

    agent.py          the agent every machine runs; shipped verbatim in the EC2 user data,
                      so it needs the standard library and `websockets` only
    local_machine.py  the init process of one LOCAL_DEV_MODE desktop sandbox
    user_data.sh      the EC2 boot script (rendered by backends/user_data.py)

Nothing here imports the rest of the provisioner: these files run as their own small
processes, on the machine, and must not pay for Celery or aiobotocore.
"""
