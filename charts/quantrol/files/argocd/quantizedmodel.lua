-- Argo CD health check for quantrol.io/QuantizedModel (argocd-cm: resource.customizations.health.quantrol.io_QuantizedModel).
-- Argo CD runs it with gopher-lua (Lua 5.1) and the object in `obj`; it must return {status=..., message=...}.
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

-- The first condition that is False names the step that said no (QualityQualified, Published, ...).
local function first_false(conditions)
  if conditions == nil then
    return nil
  end
  for _, c in ipairs(conditions) do
    if c.status == "False" and c.type ~= "Ready" then
      return c
    end
  end
  return condition(conditions, "Ready")
end

-- Rejections name the slices and limits that failed, so the reason is readable in the Argo CD UI.
local function failed_slices(quality)
  if quality == nil then
    return ""
  end
  local parts = {}
  for _, q in ipairs(quality) do
    if q.passed == false then
      local limits = ""
      if q.failedLimits ~= nil and #q.failedLimits > 0 then
        limits = " (" .. table.concat(q.failedLimits, ", ") .. ")"
      end
      table.insert(parts, tostring(q.slice) .. limits)
    end
  end
  if #parts == 0 then
    return ""
  end
  return "; failed slices: " .. table.concat(parts, "; ")
end

local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report a phase"
  return hs
end

local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local phase = status.phase
if phase == "Ready" then
  hs.status = "Healthy"
  local artifact = status.artifact and status.artifact.ref
  hs.message = "Ready" .. (artifact and (": " .. tostring(artifact)) or "")
elseif phase == "Rejected" or phase == "Failed" then
  hs.status = "Degraded"
  local c = first_false(status.conditions)
  local why = status.message
  if c ~= nil then
    why = tostring(c.type) .. " " .. tostring(c.reason) .. (c.message and (": " .. c.message) or "")
  end
  hs.message = phase .. ": " .. tostring(why or "see the model's conditions and events")
  if phase == "Rejected" then
    hs.message = hs.message .. failed_slices(status.quality)
  end
elseif phase == "Pending" or phase == "Calibrating" or phase == "Evaluating" or phase == "Publishing" then
  hs.status = "Progressing"
  hs.message = phase .. (status.jobName and (" (job " .. status.jobName .. ")") or "")
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. tostring(phase)
end
return hs
