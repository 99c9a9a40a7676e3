"""Object stores (S3, GCS, any fsspec filesystem) as watch roots and output roots.

The daemon's pipeline works on paths. An object-store watch is seen through a local *mirror* of sparse stub files
(``mirror``): discovery, readiness and trainer detection run on the stubs unchanged, while every read of a stub's
bytes goes to the object store with ranged GETs (``object_source``). Object-store outputs are staged locally and
published by ``object_outputs``: content-addressed objects first, the manifest last (the commit point).
"""
