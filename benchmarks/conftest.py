"""pytest-benchmark's machine_info, extended with what the numbers depend on here: torch, its thread
count, the C++ extension's build and instruction set, and the package sources' digest (the same fields as
``protdiff-fast bench``'s results.json)."""


def pytest_benchmark_update_machine_info(config, machine_info):
    import torch

    from protdiff_fast.bench.runner import environment

    env = environment("cpu", torch.get_num_threads())
    machine_info["protdiff_fast"] = {k: env.get(k) for k in ("torch", "threads", "thread_env", "cpp_extension",
                                                             "source_sha256", "commit", "overrides",
                                                             "load_average")}
