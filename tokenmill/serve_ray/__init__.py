"""Engine replicas on Ray Serve behind one OpenAI-compatible endpoint (`tokenmill serve
--replicas N`), routed so that a request lands where its prefix is cached.

    cluster.py        Ray start/join, the Serve deployment, the ingress app
    replica.py        EngineReplica: one AsyncEngine per replica, its routing reports
    router.py         ReplicaRouter (Serve's request router): prefix-aware or round-robin
    routing_table.py  the routers' state in a process: replica views, decisions, counters
    prefix_index.py   the router's view of each replica's prefix cache; the ranking policy
    remote_engine.py  ReplicaSetEngine: the server's engine interface over the replicas
    wire.py           what crosses between ingress and replica
    metrics.py        the replicas' metrics merged with a `replica` label

Needs `ray[serve]` (`pip install 'tokenmill[ray]'`); nothing else in tokenmill imports this.
"""
