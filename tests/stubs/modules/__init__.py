"""Test stand-in for the AUTOMATIC1111 WebUI ``modules`` package (v1.10.1, commit 82a973c).

Put ``tests/stubs`` on ``sys.path`` and ``import modules.scripts`` etc. work as inside the WebUI.
Every file here names the real file it mirrors; signatures follow v1.10.1, behaviour is reduced to
what an extension can observe. Nothing here downloads, spawns processes or needs a GPU.
"""
