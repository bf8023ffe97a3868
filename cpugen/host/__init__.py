"""The machine cpugen runs on: CPU facts, memory and cgroups, thread and memory placement, the environment a record carries."""
