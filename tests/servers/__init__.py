"""Local stand-ins for the storage backends, with fault injection, for the test suite.

``objectstores`` starts them (moto S3, the GCS emulator, a WebHDFS server) and hands
out a fresh bucket per test; ``proxy`` holds the fault controls and the reverse
proxy; ``webhdfs`` is the WebHDFS server itself.
"""
