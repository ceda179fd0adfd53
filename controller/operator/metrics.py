"""Prometheus metrics of the controller (served on --metrics-port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ALLOCATIONS = Counter("partita_controller_allocations_total", "Pod allocation attempts by result",
                      ["result"])  # allocated, unschedulable, error, conflict
ALLOCATION_SECONDS = Histogram("partita_controller_allocation_seconds", "Time to allocate a pod's claims",
                               buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
PENDING_CLAIMS = Gauge("partita_controller_pending_claims", "Partita claims of pending pods not yet allocated")
RELEASES = Counter("partita_controller_releases_total", "Allocations released after their last consumer went away")
CONFLICTS = Counter("partita_controller_conflicts_total", "Writes retried after a resourceVersion conflict")
POOLS_MISSING_TAINT = Gauge("partita_controller_pools_missing_taint",
                            "Pools labelled for the controller whose devices lack the managed taint (not allocated)")
VANISHED = Counter("partita_controller_vanished_allocations_total",
                   "Allocations cleared by someone else (kube-scheduler PostFilter) before the pod bound")
IS_LEADER = Gauge("partita_controller_leader", "1 while this instance is the active controller")
DOUBLE_ALLOCATIONS = Counter("partita_controller_double_allocations_total",
                             "Devices seen allocated to two claims at once (kept unavailable until all release)")

# --- Cluster capacity (controller/operator/capacity.py; docs/monitoring-cluster.md defines each state). -------
CAPACITY_GPUS = Gauge("partita_capacity_gpus",
                      "GPUs per node and mode: total (publishing that mode), allocated (in that mode), "
                      "free (able to take one more device of that mode)", ["node", "mode", "state"])
CAPACITY_MEMORY = Gauge("partita_capacity_memory_bytes",
                        "GPU memory per node and mode: total, allocated to devices of that mode, free for that mode",
                        ["node", "mode", "state"])
PENDING_BY_REASON = Gauge("partita_pending_claims_by_reason",
                          "Unallocated Partita claims of pending pods, by why they wait", ["reason"])
FRAGMENTED_GPUS = Gauge("partita_capacity_fragmented_gpus",
                        "GPUs with free memory that cannot take the smallest pending request of this mode",
                        ["node", "mode"])
FRAGMENTED_MEMORY = Gauge("partita_capacity_fragmented_memory_bytes",
                          "Free GPU memory that the smallest pending request of this mode cannot use",
                          ["node", "mode"])

# --- The opt-in idle policy (controller/operator/idlepolicy.py; docs/monitoring.md §3). --------------------
IDLE_POLICY_ACTIONS = Counter("partita_idle_policy_actions_total",
                              "What the idle policy did to pods of idle claims: action annotate|unannotate|evict, "
                              "result done|dry_run|blocked (429, a PodDisruptionBudget)|rate_limited|gone|error",
                              ["action", "result"])
