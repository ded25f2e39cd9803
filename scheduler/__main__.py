"""``dq beat`` (the same as ``python -m datus_queue.scheduler``): the scheduler of datus-queue.

Celery beat with redbeat (`scheduler.beat`): it sends pruning and the scheduled batches of
`scheduler.schedule` to queue ``dq.maintenance``; the workers run them. Run one or two (the second
is a hot standby); never more than one sends. Recovering a dead worker's jobs does not need it:
the workers sweep for those themselves. Started while Redis is away, it waits for Redis.
"""

from __future__ import annotations

import argparse
import sys


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dq beat", description="The scheduler: sends pruning (every DQ_PRUNE_INTERVAL_S) and the scheduled "
                                    "batches of agent.yml (agent.schedules) to the workers. A second dq beat waits "
                                    "as a hot standby. The workers sweep for a dead worker's jobs without it. Redis, "
                                    "the job store and agent.yml come from DQ_REDIS_URL, DQ_DATABASE_URL and "
                                    "DQ_CONFIG.")
    parser.add_argument("--loglevel", "-l", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    from pydantic import ValidationError

    from datus.models.config import ConfigError
    from datus_queue.tasks.settings import get_settings

    try:
        settings = get_settings()
        from datus_queue.scheduler.beat import configure
        from datus_queue.tasks.app import app
        from datus_queue.tasks.context import load_agent_config

        configure(app, settings, load_agent_config(settings))
    except ValidationError as exc:  # a DQ_ setting out of bounds
        error = exc.errors()[0]
        name = "_".join(str(part) for part in error["loc"]).upper()
        name = name if name.startswith("DQ_") else f"DQ_{name}"  # a field read under an alias has its own name
        print(f"error: {name}={error.get('input')!r}: {error['msg']}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    app.start(["beat", "--scheduler", "datus_queue.scheduler.beat:Scheduler", "--loglevel", args.loglevel])
    return 0


if __name__ == "__main__":
    sys.exit(main())
