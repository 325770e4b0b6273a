{{/* The name of every object of the release. */}}
{{- define "cachetier.fullname" -}}
{{- if contains "cachetier" .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-cachetier" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "cachetier.labels" -}}
app.kubernetes.io/name: cachetier-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "cachetier.selector" -}}
app.kubernetes.io/name: cachetier-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "cachetier.operatorImage" -}}
{{ .Values.operator.image.repository }}:{{ .Values.operator.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "cachetier.sidecarImage" -}}
{{ .Values.sidecar.image.repository }}:{{ .Values.sidecar.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "cachetier.webhookService" -}}
{{ include "cachetier.fullname" . }}-webhook
{{- end -}}
