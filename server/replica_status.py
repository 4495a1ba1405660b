"""The cluster as `overnight status` shows it (AdminService.GetCluster): the replicas on the
database, each task's leader and lease, and what each replica served."""

from __future__ import annotations

from protos import admin_pb2
from server.coordinator import Coordinator


def cluster_status(coordinator: Coordinator) -> admin_pb2.Cluster:
    """Empty for a coordinator that is not a replica. Raises StoreUnavailable."""
    from server.replica_coordinator import ReplicaCoordinator  # psycopg only for replicas

    if not isinstance(coordinator, ReplicaCoordinator):
        return admin_pb2.Cluster()
    ledger, now = coordinator.ledger, coordinator.now()
    return admin_pb2.Cluster(
        replicas=[
            admin_pb2.Cluster.Replica(
                name=r.name,
                host=r.host,
                pid=r.pid,
                seen_s_ago=max(0.0, now - r.seen_at),
                check_ins=r.check_ins,
                uploads=r.uploads,
                answering=r.name == coordinator.replica_name,
                address=r.address,
                forwarded=r.forwarded,
            )
            for r in ledger.replicas()
        ],
        leases=[
            admin_pb2.Cluster.TaskLease(
                task_id=lease.task_id,
                leader=lease.holder,
                epoch=lease.epoch,
                # A released lease expires at -inf: shown as long expired, not as -inf.
                expires_in_s=max(lease.expires_at - now, -1e9),
            )
            for lease in ledger.leases()
        ],
        counts=[
            admin_pb2.Cluster.ReplicaTaskCounts(
                replica=replica, task_id=task_id, selected=selected, reported=reported
            )
            for replica, task_id, selected, reported in ledger.replica_counts()
        ],
    )
