"""The ``dq`` command and what it starts on one machine.

    main.py       argument parsing and the subcommands (``dq worker`` hands over to workers/)
    demo.py       ``dq demo``: the sample batch end to end with a private Redis and a fake provider
    demo_tour.py  ``dq demo --quick``: the model layer alone, in-process
    services.py   a throwaway redis-server and worker processes (the demo, tests, benchmarks)
"""
