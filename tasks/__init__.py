"""The reference services from the seeds; each module holds a service's contracts and handlers."""
