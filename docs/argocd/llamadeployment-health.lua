-- Argo CD health check for llama-operator.io/LlamaDeployment (docs/install.md#argo-cd-health-check).
local hs = {}
local status = obj.status
if status == nil or status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "waiting for llama-operator to reconcile"
  return hs
end
if obj.metadata.generation ~= nil and status.observedGeneration ~= nil
    and status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "waiting for llama-operator to observe the latest spec"
  return hs
end
-- Reasons of Ready=False that resolve on their own (nodes, downloads, servers starting).
local progressing = {
  Provisioning = true, Loading = true, Progressing = true, Downloading = true,
  WaitingForNodes = true,
}
for _, condition in ipairs(status.conditions) do
  if condition.type == "Ready" then
    hs.message = condition.message
    if condition.status == "True" then
      hs.status = "Healthy"
    elseif condition.reason == "ScaledToZero" then
      hs.status = "Suspended"
    elseif progressing[condition.reason] then
      hs.status = "Progressing"
    else
      -- The spec, a referenced object, capacity or quota needs a fix: docs/operator.md lists
      -- every reason and what to do.
      hs.status = "Degraded"
    end
    return hs
  end
end
hs.status = "Progressing"
hs.message = "waiting for the Ready condition"
return hs
