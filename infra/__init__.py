"""Infrastructure: the local stack (`infra.stack`), compose and KubeRay manifests."""
