{{/* The chart name, or nameOverride. */}}
{{- define "llama-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The name of every object: fullnameOverride, or the release name (with the chart name
unless the release name already contains it). */}}
{{- define "llama-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "llama-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llama-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "llama-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "llama-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: llama-operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "llama-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llama-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "llama-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The operator configuration file: config values, with serverImage defaulted to the
llama-server image of this release. */}}
{{- define "llama-operator.config" -}}
{{- $config := deepCopy .Values.config }}
{{- if not $config.serverImage }}
{{- $_ := set $config "serverImage" (printf "ghcr.io/llama-operator/llama-server-cuda:%s" .Chart.AppVersion) }}
{{- end }}
{{- if not $config.fetchImage }}
{{- $_ := set $config "fetchImage" (printf "ghcr.io/llama-operator/llama-server:%s" .Chart.AppVersion) }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* Where the configuration file is mounted in the pod. */}}
{{- define "llama-operator.configDir" -}}/etc/llama-operator{{- end }}
