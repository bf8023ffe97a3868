from cpugen.cli import main
from cpugen.runtime.launcher import in_rank

code = main()
if in_rank():  # a rank of a split run: leaves without the interpreter's teardown (distributed.exit_rank)
    from cpugen.runtime.distributed import exit_rank

    exit_rank(code)
raise SystemExit(code)
