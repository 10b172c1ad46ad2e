"""The descriptor pool that Mandant's generated messages live in.

A pool of our own, not protobuf's default one: ``tritonclient`` registers the same
``inference.*`` symbols in the default pool, and both must load in one process.
"""
from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
