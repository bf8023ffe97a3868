from cpugen.cli import main

raise SystemExit(main())
