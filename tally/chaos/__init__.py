"""The chaos harness (issue 9 §2, ADR 24): a real `tally up`, a seeded load, faults, and a final count.

One harness for `tally chaos --minutes N` (tally/cmd_chaos.py) and the short form in tests/test_chaos.py:
`stack` (the platform and its processes), `load` (seeded requests and the ledger of 202s), `faults`
(signals to its processes), `verdict` (both stores against the ledger), `run` (all of it, in order).
Nothing here changes the platform; the faults are signals sent to its processes.
"""

from tally.chaos.faults import FAULTS, Fault, FaultRecord, parse_faults
from tally.chaos.load import ID_PATH, NOID_PATH, Ledger, LoadGenerator
from tally.chaos.run import ChaosPlan, ChaosReport, ChaosRun
from tally.chaos.stack import DOMAIN, ChaosError, ChaosStack, children_of, process_tree
from tally.chaos.verdict import StoreCheck, check_store, compare, settle

__all__ = ["DOMAIN", "FAULTS", "ID_PATH", "NOID_PATH", "ChaosError", "ChaosPlan", "ChaosReport", "ChaosRun",
           "ChaosStack", "Fault", "FaultRecord", "Ledger", "LoadGenerator", "StoreCheck", "check_store",
           "children_of", "compare", "parse_faults", "process_tree", "settle"]
