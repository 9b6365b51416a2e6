"""Makes the local evaluate module ship with the package (setuptools packages.find)."""
