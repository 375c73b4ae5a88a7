"""Command line: `python -m tkpy {info,bench,generate,serve}`."""

import sys


def main(argv: list[str]) -> int:
    commands = {
        "info": "what this build contains and runs on",
        "bench": "check and time each op against its peers (a source checkout's benchmarks/)",
        "generate": "continue prompts, or answer a chat, with a Llama-family model (tkpy.runtime)",
        "serve": "serve a model over OpenAI's completions and chat API (tkpy.runtime)",
    }
    if not argv or argv[0] not in commands:
        print("usage: python -m tkpy {info,bench,generate,serve} [options]")
        for name, what in commands.items():
            print(f"  {name:<8} {what}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "info":
        from .info import main as run
    elif argv[0] == "generate":
        from .runtime.cli import generate as run
    elif argv[0] == "serve":
        from .runtime.cli import serve as run
    else:
        from .bench import main as run
    return run(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
