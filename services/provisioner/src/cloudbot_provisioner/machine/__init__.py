"""What runs on the machine itself, not in the control plane.

    agent.py          the agent every machine runs; shipped verbatim in the EC2 user data,
                      so it needs the standard library and `websockets` only
    local_machine.py  the init of one LOCAL_DEV_MODE desktop, on the host: it runs the
                      desktop's bubblewrap sandbox and its two ways out
    desktop.py        the init inside that sandbox (the desktop and the agent); standard
                      library only, like the agent
    user_data.sh      the EC2 boot script (rendered by backends/user_data.py)

Nothing here imports the rest of the provisioner: these files run as their own small
processes, on the machine, and must not pay for Celery or aiobotocore.
"""
