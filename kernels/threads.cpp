// Thread placement for cpugen's compute threads: pins each of ATen's intra-op worker threads (the
// pool every kernel here and every torch CPU op runs on) to one CPU, and reports each worker's
// kernel thread id so that the pinning can be read back from the OS (/proc/self/task/<tid>/status).
// Used by cpugen/placement.py; checked by tests/test_placement.py.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <vector>

// Runs one task per worker (grain 1 over as many indices as threads); worker t pins itself to
// cpus[t]. Returns the kernel thread id of each worker, in worker order (-1 where one did not run).
std::vector<int64_t> pin(const std::vector<int64_t>& cpus) {
  const int64_t n = static_cast<int64_t>(cpus.size());
  TORCH_CHECK(n >= 1, "cpugen pin: no CPUs given");
  std::vector<int64_t> tids(n, -1);
  std::vector<int> errors(n, 0);
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    const int t = at::get_thread_num();
    if (t >= n) return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(static_cast<int>(cpus[t]), &set);
    errors[t] = sched_setaffinity(0, sizeof(set), &set) ? errno : 0;
    tids[t] = static_cast<int64_t>(syscall(SYS_gettid));
  });
  for (int64_t t = 0; t < n; ++t)
    TORCH_CHECK(errors[t] == 0, "cpugen pin: worker ", t, " could not be pinned to CPU ", cpus[t], " (errno ",
                errors[t], ")");
  return tids;
}

// The kernel thread id of each worker that runs a task when `n` tasks are handed out.
std::vector<int64_t> worker_tids(int64_t n) {
  std::vector<int64_t> tids(n, -1);
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    const int t = at::get_thread_num();
    if (t < n) tids[t] = static_cast<int64_t>(syscall(SYS_gettid));
  });
  return tids;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pin", &pin, "pins ATen's worker t to cpus[t]; returns the workers' thread ids");
  m.def("worker_tids", &worker_tids, "the thread id of each ATen worker");
}
