{{/* Names, labels and images shared by every template. */}}

{{- define "sluice.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{/* Full name prefix: the release name, plus the chart name unless it is already in it. */}}
{{- define "sluice.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "sluice.operatorName" -}}
{{- printf "%s-operator" (include "sluice.fullname" .) }}
{{- end }}

{{- define "sluice.metricsServiceName" -}}
{{- printf "%s-operator-metrics" (include "sluice.fullname" .) }}
{{- end }}

{{- define "sluice.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sluice.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "sluice.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "sluice.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sluice
{{- end }}

{{- define "sluice.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sluice.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* image: repository, then @digest if set, else :tag (default appVersion). */}}
{{- define "sluice.image" -}}
{{- $img := index . 0 }}{{- $root := index . 1 }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository (default $root.Chart.AppVersion $img.tag) }}
{{- end }}
{{- end }}

{{/*
The operator pods' affinity: .Values.affinity merged over a preferred pod anti-affinity on
kubernetes.io/hostname, so that replicas land on different nodes where they can (a standby on
the leader's node would go down with it). A podAntiAffinity in .Values.affinity replaces the
default; an empty one removes it.
*/}}
{{- define "sluice.affinity" -}}
{{- $affinity := deepCopy (default dict .Values.affinity) }}
{{- if not (hasKey $affinity "podAntiAffinity") }}
{{- $term := dict "topologyKey" "kubernetes.io/hostname" "labelSelector" (dict "matchLabels" (include "sluice.selectorLabels" . | fromYaml)) }}
{{- $_ := set $affinity "podAntiAffinity" (dict "preferredDuringSchedulingIgnoredDuringExecution" (list (dict "weight" 100 "podAffinityTerm" $term))) }}
{{- else if empty (get $affinity "podAntiAffinity") }}
{{- $_ := unset $affinity "podAntiAffinity" }}
{{- end }}
{{- with $affinity }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{/* The Batch API server (api.enabled): names, labels, and the checks of its values. */}}
{{- define "sluice.apiName" -}}
{{- printf "%s-api" (include "sluice.fullname" .) }}
{{- end }}

{{- define "sluice.apiSelectorLabels" -}}
app.kubernetes.io/name: {{ include "sluice.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: api
{{- end }}

{{- define "sluice.apiServiceAccountName" -}}
{{- if .Values.api.serviceAccount.create }}
{{- default (include "sluice.apiName" .) .Values.api.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.api.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "sluice.apiKeysSecretName" -}}
{{- default (printf "%s-keys" (include "sluice.apiName" .)) .Values.api.keys.existingSecret }}
{{- end }}

{{/* Fail the render when the server could not start, or would start open to anyone. */}}
{{- define "sluice.apiValidate" -}}
{{- $config := .Values.api.config }}
{{- if not $config.models }}
{{- fail "api.enabled=true needs api.config.models: name at least one model the Batch API serves (name -> {uri: s3://...})" }}
{{- end }}
{{- if not (dig "cluster" "storageUri" "" $config) }}
{{- fail "api.enabled=true needs api.config.cluster.storageUri: where the Batch API keeps each tenant's files (s3://bucket/prefix)" }}
{{- end }}
{{- if and (not .Values.api.keys.existingSecret) (not .Values.api.keys.hashes) }}
{{- fail "api.enabled=true needs api.keys.hashes or api.keys.existingSecret: without API keys the server would accept any key" }}
{{- end }}
{{- end }}
