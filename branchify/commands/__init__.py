"""The commands: ``branchify`` (``cli``), the demo (``demo``) and their shared pieces (``common``)."""
