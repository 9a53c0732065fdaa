"""Plugin discovery."""
