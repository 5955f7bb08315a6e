"""Claims: no two guests share an identity, on the host and across a cluster.

A guest's DAC uid, MCS category pair, SMACK slot label and (on shared
storage) its writable images are claimed before they are used, so no other
guest of this host or of another host is handed them meanwhile:

``host.py``     :class:`HostClaims`, one file per claimed identity in one
                directory for the whole host, under one lock; what decides
``cluster.py``  :class:`ClusterClaims`, the same claims as keys in etcd,
                created in one compare-and-swap transaction under the host's
                lease; uniqueness between hosts (the ``[cluster]`` table of
                the host config, :mod:`svirt.config`)
``etcd.py``     the etcd v3 client: ``etcd3gw`` (the gRPC gateway's JSON API)
                over every configured endpoint in turn; a transport failure on
                every one is :class:`~svirt.errors.NoQuorum`
``lease.py``    the host's lease: one per host (its id in the claims
                directory), kept alive by every svirt process that holds a
                guest of the host, and the fence rule when it cannot be

The package sees plain data, never a registry: the keys a record claims,
their :class:`~svirt.claims.host.Owner` (one :class:`~svirt.claims.host.Claim`)
and a fence callback that stops the guest when the cluster may hand its keys
to another.  The registry (:mod:`svirt.launcher.registry`) calls it; it never
calls the registry.

Keys in etcd (values are JSON: host, registry, guest name, uuid, created)::

    /svirt/CLUSTER/uid/1500003          a DAC uid          (claim uid-1500003)
    /svirt/CLUSTER/mcs/c17-c942         an MCS pair        (claim mcs-c17-c942)
    /svirt/CLUSTER/smack/svirt-3        a SMACK label      (claim smack-svirt-3)
    /svirt/CLUSTER/image/SHA256         a writable image   (claim image-SHA256)
    /svirt/CLUSTER/hosts/HOST           the host, while it holds a lease
"""
