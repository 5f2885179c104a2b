{{/* Names and labels shared by every template. */}}

{{- define "quantrol.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's full name; the release name alone when it already contains the chart's. */}}
{{- define "quantrol.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "quantrol.selectorLabels" -}}
app.kubernetes.io/name: {{ include "quantrol.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "quantrol.labels" -}}
{{ include "quantrol.selectorLabels" . }}
app.kubernetes.io/part-of: quantrol
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "quantrol.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "quantrol.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The operator image, by digest when one is given (a tag can be moved, a digest cannot). */}}
{{- define "quantrol.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The namespaces watched in namespaced mode, as a JSON list (templates cannot return lists). */}}
{{- define "quantrol.watchedNamespaces" -}}
{{- if .Values.watch.namespaces -}}
{{- .Values.watch.namespaces | toJson -}}
{{- else -}}
{{- list .Release.Namespace | toJson -}}
{{- end -}}
{{- end -}}

{{/* The operator's permissions, parsed once from files/rbac.yaml. */}}
{{- define "quantrol.rbacRules" -}}
{{- .Files.Get "files/rbac.yaml" -}}
{{- end -}}

{{/* A label map as `k=v,k2=v2`, sorted by key (the operator's QUANTROL_POD_MONITOR_LABELS). */}}
{{- define "quantrol.labelList" -}}
{{- $pairs := list -}}
{{- range $key, $value := . -}}
{{- $pairs = append $pairs (printf "%s=%s" $key $value) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}
