"""What the test modules share: paths, request bodies, artifacts, servers, repositories, clusters.

Test modules import from here, never from one another or from a conftest.py, so that each can be
read, moved or run alone; a conftest.py holds fixtures only.
"""
