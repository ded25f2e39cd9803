"""Maintenance: what keeps every job moving, run by the workers when `dq beat` says so.

    tasks.py          the Celery tasks dq.sweep, dq.prune, dq.run_schedule (queue dq.maintenance)
    sweeper.py        overdue jobs with no live message are sent again; too many re-sends: dead
    live_messages.py  which jobs still have a message in Redis (queue lists, kombu's unacked)
    dead_letters.py   dq dead replay / purge
    prune.py          expiry of old rows and stray keys, in bounded chunks
    schedules.py      agent.yml schedules: scheduled dq batch runs, once per slot

The periodic schedule itself (what `dq beat` sends, and when) is `scheduler/schedule.py`.
"""
