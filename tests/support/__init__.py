"""The test harness: what tests (and bench/) share instead of copying.

files        REPO, JSONL read/write
ports        a free loopback port
waiting      `wait_for`: polls, fails at once when a watched process dies, says what it waited for
processes    process finders that see vLLM's engine processes, daemon finders
services     start and stop a service process (its own process group, its output in a log)
environment  the environment of a `vllm-batch` process: its own folders, CPU engine settings
request_lines request lines (chat and completion) as the batch input file holds them
cli          `vllm-batch` as a subprocess
inprocess    one batch run in the test's own process on the session's engine
postgres     a throwaway database on the machine's server, or a throwaway cluster of one's own
"""
