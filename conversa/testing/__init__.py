"""What users need to test their own agents and backends: fakes and the storage conformance suite.

The conformance suite lives in ``conversa.testing.conformance`` (it imports pytest and hypothesis,
so it is not imported here).
"""
