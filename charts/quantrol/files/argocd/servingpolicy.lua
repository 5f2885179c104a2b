-- Argo CD health check for quantrol.io/ServingPolicy (argocd-cm: resource.customizations.health.quantrol.io_ServingPolicy).
-- Argo CD runs it with gopher-lua (Lua 5.1) and the object in `obj`; it must return {status=..., message=...}.
-- The operator never writes spec, so health comes only from status: phase first, then the Ready condition.
local hs = {}

local function condition(conditions, ctype)
  if conditions == nil then
    return nil
  end
  for _, c in ipairs(conditions) do
    if c.type == ctype then
      return c
    end
  end
  return nil
end

local function describe_rollback(status)
  local rb = status.rollback
  if rb == nil then
    return "rolled back to the stable artifact"
  end
  local msg = "rolled back: " .. tostring(rb.reason)
  if rb.slo ~= nil then
    msg = msg .. " (" .. rb.slo
    if rb.candidateValue ~= nil and rb.limit ~= nil then
      msg = msg .. " " .. tostring(rb.candidateValue) .. " > limit " .. tostring(rb.limit)
    end
    msg = msg .. ")"
  end
  if rb.message ~= nil and rb.message ~= "" then
    msg = msg .. ": " .. rb.message
  end
  return msg
end

local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report a phase"
  return hs
end

-- A status written for an older spec says nothing about the current one (e.g. a new candidate after a rollback).
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local phase = status.phase
local ready = condition(status.conditions, "Ready")
local weight = ""
if status.weights ~= nil and status.weights.candidate ~= nil then
  weight = ", candidate weight " .. tostring(status.weights.candidate) .. "%"
end

if phase == "Promoted" then
  if ready ~= nil and ready.status == "False" then
    hs.status = "Degraded"
    hs.message = "Promoted but not ready: " .. tostring(ready.reason) .. ": " .. tostring(ready.message or "")
  else
    hs.status = "Healthy"
    hs.message = "Promoted; serving " .. tostring(status.stableArtifact or "the candidate")
  end
elseif phase == "RolledBack" then
  hs.status = "Degraded"
  hs.message = describe_rollback(status)
elseif phase == "Failed" then
  hs.status = "Degraded"
  if ready ~= nil and ready.message ~= nil and ready.message ~= "" then
    hs.message = "Failed: " .. tostring(ready.reason) .. ": " .. ready.message
  else
    hs.message = "Failed: " .. tostring(status.message or "see the policy's conditions and events")
  end
elseif phase == "Paused" then
  hs.status = "Suspended"
  hs.message = "Paused" .. weight .. (status.message and ("; " .. status.message) or "")
elseif phase == "Pending" or phase == "Shadow" or phase == "Canary" then
  hs.status = "Progressing"
  local step = ""
  if phase == "Canary" and status.step ~= nil then
    step = " step " .. tostring(status.step)
  end
  hs.message = phase .. step .. weight
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. tostring(phase)
end
return hs
