"""The adapter tools: extract, merge, export, predict, inspect (same as `python -m trainer <verb>`).

    python tools/adapters.py extract runs/demo --expert agnews --out out/agnews-peft
    python tools/adapters.py merge runs/demo --task agnews --out out/agnews-merged
    python tools/adapters.py export runs/demo --out out/bundle && \\
        python tools/adapters.py predict --bundle out/bundle --input requests.jsonl
    python tools/adapters.py inspect runs/demo
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
