"""Throwaway replicated topologies for test suites: Sentinel (a master, its replicas and
sentinels) and Redis Cluster (masters with replicas, the slots spread over the masters).

Built from the same ``redis-server`` / ``valkey-server`` binaries as :mod:`celery_msg.testing`
(a sentinel is the server binary started with ``--sentinel``), each process on a free port of
127.0.0.1 with its own directory, so a test can SIGKILL a master and watch its replica take
over. Timings are short on purpose: a master is declared down after about 1 s, so a failover
takes about 2-5 s here. With ``tls=TLSFiles(...)`` every process listens on TLS only (among
themselves too) and the broker URLs use ``celery-msgs``.

    with SentinelTopology("valkey") as topo:
        url = topo.broker_url()   # celery-msg+sentinel://127.0.0.1:P1/0;...
        options = {"master_name": topo.master_name}

    with ClusterTopology("redis", masters=3, replicas=1) as cluster:
        url = cluster.broker_url()   # celery-msg+cluster://127.0.0.1:P1;...
"""

from .base import Topology, stopped, wait_replicated
from .cluster import CLUSTER_BUS_OFFSET, CLUSTER_SLOTS, ClusterNodeProcess, ClusterTopology
from .sentinel import SentinelProcess, SentinelTopology

__all__ = [
    "CLUSTER_BUS_OFFSET",
    "CLUSTER_SLOTS",
    "ClusterNodeProcess",
    "ClusterTopology",
    "SentinelProcess",
    "SentinelTopology",
    "Topology",
    "stopped",
    "wait_replicated",
]
