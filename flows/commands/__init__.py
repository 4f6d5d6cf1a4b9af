"""One module per `llmforge` subcommand. Each defines ``HELP`` (one line), ``configure(parser)``
and ``run(args) -> int``, and imports heavy libraries (torch, prefect, mlflow) only inside
``run`` so that ``llmforge --help`` stays instant."""
