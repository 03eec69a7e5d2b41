from __future__ import annotations
from typing import Any
import argparse
def add_parser(sub: Any) -> None:
    p = sub.add_parser("doctor")
    p.set_defaults(func=run)
def run(args: argparse.Namespace) -> int:
    return 0
