{{/* Names, labels and shared fragments. */}}

{{- define "partita.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "partita.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "partita.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "partita.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "partita.pluginName" -}}{{ include "partita.fullname" . }}-plugin{{- end -}}
{{- define "partita.controllerName" -}}{{ include "partita.fullname" . }}-controller{{- end -}}
{{- define "partita.webhookName" -}}{{ include "partita.fullname" . }}-webhook{{- end -}}

{{/*
DeviceClass name for a base class (gpu/mig/shared), as driver/api/deviceclasses.py names it:
the shipped names for gpu.partita.dev, else "<base>.<driver without a leading gpu.>".
*/}}
{{- define "partita.className" -}}
{{- $driver := .root.Values.driverName -}}
{{- if eq $driver "gpu.partita.dev" -}}
{{ .base }}.partita.dev
{{- else -}}
{{ .base }}.{{ trimPrefix "gpu." $driver }}
{{- end -}}
{{- end -}}

{{/* The managed device taint Partita's controller owns (driver/api/constants.py; a chart test checks). */}}
{{- define "partita.taintKey" -}}partita.dev/managed{{- end -}}
{{- define "partita.taintValue" -}}controller{{- end -}}
{{- define "partita.taintEffect" -}}NoSchedule{{- end -}}
