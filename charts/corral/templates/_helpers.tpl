{{/* Chart name. */}}
{{- define "corral.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, or the release name when it already contains the chart name. */}}
{{- define "corral.fullname" -}}
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

{{- define "corral.baseLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}

{{- define "corral.labels" -}}
{{ include "corral.baseLabels" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "corral.operatorLabels" -}}
{{ include "corral.baseLabels" . }}
{{ include "corral.operatorSelectorLabels" . }}
{{- end }}

{{- define "corral.operatorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "corral.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "corral.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "corral.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "corral.operatorImage" -}}
{{- $i := .Values.operator.image -}}
{{- printf "%s:%s" $i.repository (default .Chart.AppVersion $i.tag) }}
{{- end }}

{{- define "corral.rayImage" -}}
{{- $i := .Values.operator.rayImage -}}
{{- printf "%s:%s" $i.repository (default .Chart.AppVersion $i.tag) }}
{{- end }}

{{- define "corral.webhookService" -}}
{{- printf "%s-webhook" (include "corral.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "corral.webhookSecret" -}}
{{- printf "%s-webhook-tls" (include "corral.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
RBAC: exactly the API calls of operator/corral/operator/*.py (tests/unit/test_chart_rbac.py derives the
same list from the code and compares). Namespaced rules: the watched resources and what the operator
creates. Cluster rules: what kopf itself watches across the cluster.
*/}}
{{- define "corral.namespacedRules" -}}
- apiGroups: ["corral.dev"]
  resources: ["modelpools", "routingpolicies"]
  verbs: ["get", "list", "patch", "watch"]
- apiGroups: ["corral.dev"]
  resources: ["modelpools/status", "routingpolicies/status"]
  verbs: ["patch"]
- apiGroups: ["ray.io"]
  resources: ["rayservices"]
  verbs: ["create", "delete", "get", "patch"]
- apiGroups: ["ray.io"]
  resources: ["rayclusters"]
  verbs: ["list", "patch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{/* with peering: the operator creates the KopfPeering (kube.ensure_peering), kopf watches and patches it */}}
{{- define "corral.peeringRules" -}}
{{- if .Values.operator.peering.enabled }}
- apiGroups: ["kopf.dev"]
  resources: [{{ if .Values.operator.watchNamespaces }}"kopfpeerings"{{ else }}"clusterkopfpeerings"{{ end }}]
  verbs: ["create", "list", "patch", "watch"]
{{- end }}
{{- end }}

{{- define "corral.clusterRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if .Values.operator.watchNamespaces }}
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- if .Values.webhook.enabled }}
{{- /* kopf manages the (empty, chart-created) webhook configurations `corral.dev`: creates if absent, patches */}}
- apiGroups: ["admissionregistration.k8s.io"]
  resources: ["mutatingwebhookconfigurations", "validatingwebhookconfigurations"]
  verbs: ["create", "patch"]
{{- end }}
{{- end }}
