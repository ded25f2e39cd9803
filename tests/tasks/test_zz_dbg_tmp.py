from tests.tasks.test_batch_cli import *  # noqa
from tests.tasks.test_batch_cli import stack  # noqa

def test_dbg(stack):
    ids = ["q01", "q02", "q03"]
    source = stack.dir / "dbg.jsonl"
    write_questions(source, "dbg", ids)
    out = stack.dir / "dbg.jsonl.out"
    proc = dq(stack, "batch", str(source), "--model", MODEL, "--db", stack.shop_url, "--out", str(out), "--max-in-flight", "1")
    print(proc.stdout, proc.stderr)
    print(out.read_text())
    print((stack.dir / "worker.log").read_text()[-3000:])
