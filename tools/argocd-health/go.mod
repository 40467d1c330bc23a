// Only used by scripts/build-argocd-health.sh, for the tests of docs/argocd/*.lua.
module llama-operator.io/tools/argocd-health

go 1.26.0

// The Lua interpreter Argo CD runs health checks with (the version Argo CD v3.6.1 pins).
require github.com/yuin/gopher-lua v1.1.2
