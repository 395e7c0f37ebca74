"""The metadata server: cloud-init data over HTTP at 169.254.169.254, per guest address."""
