"""`python -m leap_dspy.envs.intercode --load-mysql --build-sqlite`: prepare the InterCode-SQL data."""

from __future__ import annotations

from leap_dspy.envs.intercode import spider
from leap_dspy.envs.intercode.sql_env import load_mysql


def _main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="InterCode-SQL data setup")
    ap.add_argument("--load-mysql", action="store_true", help="load spider_dev.sql into the local MariaDB/MySQL")
    ap.add_argument("--build-sqlite", action="store_true", help="build the cached SQLite files")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    if args.build_sqlite:
        print(f"SQLite Spider databases in {spider.sqlite_dir()}")
    if args.load_mysql:
        print(load_mysql(force=args.force))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
