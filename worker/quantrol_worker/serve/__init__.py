"""`quantrol-worker serve -- <vLLM args>`: run vLLM's OpenAI server and verify the kernels it actually loads.

- `logparse`: vLLM's kernel-selection log lines → events (pure);
- `verify`: events → a verdict against the shared kernel table (`quantrol_worker.kernels`) (pure);
- `http`: the launcher's own port with `quantrol_engine_kernel_info` and a JSON view;
- `launcher`: the child process, log pass-through, signal forwarding, termination message.

Torch-free: the launcher never imports vLLM, it reads what vLLM prints.
"""
