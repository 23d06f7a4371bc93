"""The CloudBot provisioner: a Celery worker and beat that drive each instance through its
lifecycle. It writes every state move after the one a request makes; who writes which
state is stated once, in `cloudbot_common.lifecycle`.

    worker.py / celery_app.py   the Celery app, its beat schedule, per-process start-up
    runtime.py                  the event loop, engine, Redis and backend of one process
    tasks.py                    one task per command of the lifecycle table; retries
    instances/handlers.py       what each command does (provision, stop, start, terminate)
    instances/steps.py          the machinery handlers and the reconciler share: one
                                delivery (Step), the locked row (Tx), Done or Wait
    instances/guard.py          one handler per instance at a time (Postgres advisory lock)
    outbox_relay.py             republishes outbox commands nobody picked up
    reconciler.py               makes Postgres and the backend agree again
    backends/                   where machines run: ec2.py (aiobotocore), local.py
                                (LOCAL_DEV_MODE desktops), user_data.py (renders the boot script)
    machine/                    what runs on the machine itself, never in the worker:
                                agent.py, local_machine.py (a local desktop's init), user_data.sh

Run: `celery -A cloudbot_provisioner.worker worker -Q provisioning` and, exactly once per
deployment, `celery -A cloudbot_provisioner.worker beat`.
"""
